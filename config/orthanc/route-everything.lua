-- The naive rule: route every stable study to the node, whatever it holds, including the node's own
-- output when it comes back. Not recommended (it sends data the node does not need), but safe: the
-- node recognises its own series and never processes them again. route-to-upete.lua is the rule to use.

function OnStableStudy(studyId, tags, metadata)
  print('upete-rule ran')
  RestApiPost('/modalities/upete/store', '{"Resources":["' .. studyId .. '"],"Synchronous":true}')
end
