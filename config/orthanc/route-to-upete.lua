-- Orthanc → uPETe node: route each stable PET/CT study to the node, PET and CT series, once each,
-- and never the node's own output (the loop guard). Install with orthanc.json beside it
-- ("LuaScripts"), the node as DicomModalities key "upete". See docs/PACS.md.
--
-- A series is the node's own output when its Manufacturer is "uPETe node" (derived PET and preview
-- Secondary Capture), or its SeriesDescription ends with the node's suffix (" uPETe",
-- " uPETe preview"), or its first instance is DERIVED with a DerivationDescription naming the node.

local MODALITY = 'upete'           -- the DicomModalities key (not the AE title)
local OUR_MANUFACTURER = 'uPETe node'
local OUR_SUFFIXES = { ' uPETe', ' uPETe preview' }

routed = routed or {}              -- series already sent (in memory; the node is idempotent anyway)

local function endsWith(text, suffix)
  return suffix ~= '' and string.sub(text, -string.len(suffix)) == suffix
end

local function isOurs(series)
  local tags = series['MainDicomTags']
  if (tags['Manufacturer'] or '') == OUR_MANUFACTURER then
    return true
  end
  local description = tags['SeriesDescription'] or ''
  for _, suffix in ipairs(OUR_SUFFIXES) do
    if endsWith(description, suffix) then
      return true
    end
  end
  local instances = series['Instances'] or {}
  if #instances > 0 then
    local first = ParseJson(RestApiGet('/instances/' .. instances[1] .. '/simplified-tags'))
    local imageType = first['ImageType'] or ''
    local derivation = first['DerivationDescription'] or ''
    if string.find(imageType, 'DERIVED', 1, true) and string.find(derivation, OUR_MANUFACTURER, 1, true) then
      return true
    end
  end
  return false
end

function OnStableStudy(studyId, tags, metadata)
  print('upete-rule ran')
  local pet, ids = false, {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local modality = series['MainDicomTags']['Modality'] or ''
    if (modality == 'PT' or modality == 'CT') and not isOurs(series) then
      if modality == 'PT' then
        pet = true
      end
      if not routed[series['ID']] then
        table.insert(ids, series['ID'])
      end
    end
  end
  if not pet or #ids == 0 then
    return                         -- no PET to enhance, or everything was routed already
  end
  local quoted = {}
  for _, id in ipairs(ids) do
    table.insert(quoted, '"' .. id .. '"')
  end
  local body = '{"Resources":[' .. table.concat(quoted, ',') .. '],"Synchronous":true}'
  RestApiPost('/modalities/' .. MODALITY .. '/store', body)
  for _, id in ipairs(ids) do      -- only after the store succeeded (RestApiPost raises otherwise)
    routed[id] = true
  end
  print('upete-rule routed ' .. #ids .. ' series of study ' .. studyId)
end
